import argparse
import json
import sys

from . import discovery, overhead, planning, ready, runner

BENCHES = {"planning": planning.run, "overhead": overhead.run, "runner": runner.run, "discovery": discovery.run, "ready": ready.run}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    report = BENCHES[args.name](quick=args.quick)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report.get("ok", True) else 1


sys.exit(main())
