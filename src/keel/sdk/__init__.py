"""The public SDK: decorators, futures and the step context."""
