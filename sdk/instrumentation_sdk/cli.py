"""`llm-observe` command line (skeleton: the start/status/stop/check commands come with the SDK issue)."""

import sys


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["--help"], ["-h"]):
        print("usage: llm-observe {start,status,stop,check} (not implemented yet in this build)")
        return 0
    print(f"llm-observe: '{args[0]}' is not implemented yet in this build", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
