"""Run a module as `python -m` would, dumping every thread's Python stack every N seconds.

For a run that seems to hang: `python scripts/dev/run_with_stack_dumps.py 30 stacks.txt benchmarks.throughput ...`.
"""
import faulthandler
import runpy
import sys

if __name__ == "__main__":
    interval, path, module, *rest = sys.argv[1:]
    sink = open(path, "w")
    faulthandler.dump_traceback_later(float(interval), repeat=True, file=sink)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
