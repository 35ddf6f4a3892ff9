"""How many examples a training run draws, apart from the code that draws them, so that the CLI can show the
defaults without importing torch."""

POOL = 20_000  # training examples drawn and encoded before the first step
HELD_OUT = 256  # held-out examples whose losses the report gives before and after
