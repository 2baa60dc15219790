"""Model builders owned by rlmesh: the tiny character-level Qwen2 of the embedded default recipe."""
