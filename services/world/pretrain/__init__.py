"""Pretraining of the stand-ins for the parts NExT-GPT keeps frozen (ImageBind, the LM, the three decoders)."""
