"""Everything that turns prompts into training experience for the on-policy stages: the sampler and its engines
(sampler.py), reward scoring (rewards.py), the critic (critic.py) and the one experience batch and its
sample -> score -> metrics path (experience.py)."""
