"""The scheduler process: FCFS batching of sequences under token and sequence budgets."""
