"""What people run: the ``moe`` command line, jobs and benchmarks. The only layer that reads argv
and YAML, prints progress and talks to DeepSpeed's launcher or Ray."""
