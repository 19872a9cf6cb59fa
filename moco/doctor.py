"""``python -m moco.doctor`` moved to ``python -m moco.runtime.doctor``; this alias says so and runs it."""
import runpy
import sys

if __name__ == "__main__":
    print("python -m moco.doctor is now python -m moco.runtime.doctor", file=sys.stderr)
    runpy.run_module("moco.runtime.doctor", run_name="__main__", alter_sys=True)
