"""Runtime: the IR as a Python program, backends, and OptimizedModel."""
