#!/usr/bin/env python3
"""sos: the three SOS programs in one executable (packaging/build.sh).

The static build carries a whole Python runtime; three binaries carried it
three times.  This one carries it once and runs the program it is called as:

    blob-server -store data        # a link named blob-server (or sos-server,
    sos-server -blob-server ...    # or replicate) to this executable
    sos blob-server -store data    # the same, the program as first argument

The program's module is imported only once chosen, so each start-up loads
what that program alone would (blob-server still imports everything it needs
before it chroots: its own module does that at import time).  Each program's
main(argv) is called with the rest of the arguments, and its return value is
the exit status.
"""
import os
import sys

USAGE = ("usage: sos PROGRAM [ARGS...]   (PROGRAM: blob-server, sos-server, "
         "replicate),\n   or run it through a link named after the program\n")


# Each an import PyInstaller sees (it follows imports inside functions too),
# done only when that program runs.
def blob_server(argv):
    import blob
    return blob.main(argv)


def sos_server(argv):
    import sos
    return sos.main(argv)


def replicate(argv):
    import replicate
    return replicate.main(argv)


PROGRAMS = {"blob-server": blob_server, "sos-server": sos_server,
            "replicate": replicate}


def invoked_as(argv):
    """The name this executable was run as.

    In the static build (staticx around PyInstaller) argv[0] is no longer
    what the caller gave: staticx runs its unpacked copy of the program, and
    tells it only the path of the executable file, as /proc/self/exe names
    it.  For a hard link that is the link's own path; a symbolic link is
    resolved to its target (sos), so the links must be hard ones (or
    copies)."""
    path = os.environ.get("STATICX_PROG_PATH") if getattr(sys, "frozen", False) else None
    return os.path.basename(path or (argv[0] if argv else ""))


def main(argv):
    name = invoked_as(argv)
    args = argv[1:]
    if name not in PROGRAMS:
        if args and args[0] in PROGRAMS:
            name, args = args[0], args[1:]
        elif args[:1] == ["--version"]:
            import blob
            print("sos " + blob.VERSION)
            return 0
        elif args[:1] in (["-h"], ["--help"]):
            sys.stdout.write(USAGE)
            return 0
        else:
            sys.stderr.write(USAGE)
            return 2
    # argparse takes its prog name from each parser; sys.argv[0] is what
    # tracebacks and logging would show.
    sys.argv = [name] + args
    # The process's name (ps, top, pgrep) is the executable's by default,
    # "sos" for all three; each program's own name, as before.
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass
    return PROGRAMS[name](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
