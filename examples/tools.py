"""Tools of the agent examples (agent_sft.yaml, and the prompts in data/agent_prompts.jsonl for tool-calling RL).

A tool is a deterministic Python function with type hints and a Google-style docstring (one `Args:` line per
argument): rlhf_time.agents.tool_schema builds its JSON schema from them, and a model's call
{"name": "multiply", "arguments": {"a": 3, "b": 4}} runs multiply(a=3, b=4)."""


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.

    Returns:
        The product a * b.
    """
    return a * b
