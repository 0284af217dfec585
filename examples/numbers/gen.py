"""Writes the integers 0..n-1, one per line."""
import sys

n, out = int(sys.argv[1]), sys.argv[2]
with open(out, "w") as f:
    f.write("".join(f"{i}\n" for i in range(n)))
