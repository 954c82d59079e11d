"""consistency-lens: explain an LLM activation through a textual bottleneck."""
