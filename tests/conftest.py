import os

# Triton's interpreter must be chosen before `import triton` anywhere in the process.
os.environ.setdefault("TRITON_INTERPRET", "1")
