"""``python -m moco.tinyset`` moved to ``python -m moco.course.tinyset``; this alias says so and runs it."""
import runpy
import sys

if __name__ == "__main__":
    print("python -m moco.tinyset is now python -m moco.course.tinyset", file=sys.stderr)
    runpy.run_module("moco.course.tinyset", run_name="__main__", alter_sys=True)
