"""The in-process benchmark, and what every measurement here shares: workload, machine, memory,
tables and profiles."""
