"""Helpers of the sos-server and replicate tests: now in support.py (the
tests' one support module); these names stay importable from here."""

from support import (Front, InProcess, blob_path, flip_byte,  # noqa: F401
                     get_json, request, stop_hard)
