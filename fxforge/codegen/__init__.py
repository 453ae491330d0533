"""Code generation for fxforge graphs."""
