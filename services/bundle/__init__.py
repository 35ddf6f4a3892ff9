"""Model bundle tooling: the tiny builder, the NExT-GPT converter, and the validating loader."""
