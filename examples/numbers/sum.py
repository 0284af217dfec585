"""Sums the integers of a file, one per line."""
import sys

with open(sys.argv[1]) as f:
    total = sum(int(line) for line in f)
with open(sys.argv[2], "w") as f:
    f.write(f"{total}\n")
