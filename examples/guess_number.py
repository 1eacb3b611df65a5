"""A multi-turn environment for examples/guess_number.yaml: the model guesses a secret number, the environment
answers "higher" or "lower" until the guess is right or the turns run out (rollout.max_tool_turns).

Reward: 1 for finding the number, minus 0.1 for every wrong guess before it, and -0.1 for a turn without a
number. The environment is deterministic given the record (its `secret` field), as resume requires.
"""

import re


class GuessTheNumber:
    def reset(self, record):
        self.secret = int(record["secret"])
        return None  # the record's own prompt explains the game

    def step(self, text):
        found = re.search(r"-?\d+", text)
        if found is None:
            return "Answer with one number.", -0.1, False
        guess = int(found.group())
        if guess == self.secret:
            return None, 1.0, True
        return ("higher" if guess < self.secret else "lower"), -0.1, False
