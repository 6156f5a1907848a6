import argparse
import json
import sys

from . import (chaos, discovery, hetero, matrix, memory, overhead, planning, ready, runner, security, serving, suite,
               traffic, transfer)

BENCHES = {"planning": planning.run, "overhead": overhead.run, "runner": runner.run, "discovery": discovery.run,
           "ready": ready.run, "traffic": traffic.run, "memory": memory.run, "matrix": matrix.run,
           "security": security.run, "chaos": chaos.run, "transfer": transfer.run, "serving": serving.run, "hetero": hetero.run}


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        return suite.main(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench", description="`run` for the whole suite, or one benchmark")
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--minutes", type=float, help="chaos: how long to soak (default 15, quick 3)")
    parser.add_argument("--seed", type=int, help="chaos: the seed of a run to repeat")
    parser.add_argument("--pinned", action="store_true",
                        help="matrix: 2 ranks, each on a core of its own (as on two machines)")
    parser.add_argument("--profiles", help="matrix: link profiles, comma-separated (default: all)")
    args = parser.parse_args()
    if args.name == "chaos":
        report = chaos.run(quick=args.quick, minutes=args.minutes, seed=args.seed)
    elif args.name == "matrix":
        report = matrix.run(quick=args.quick, pinned=args.pinned,
                            profiles=args.profiles.split(",") if args.profiles else None)
    else:
        report = BENCHES[args.name](quick=args.quick)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report.get("ok", True) else 1


sys.exit(main())
