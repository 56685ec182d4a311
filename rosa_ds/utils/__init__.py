"""Cross-cutting chores shared by every layer, one helper each: atomic files and locks (``io``),
rank and world without DeepSpeed (``dist``), installed packages (``packages``), rank-aware logging
(``log``) and typed options (``options``). Pure Python and torch; no DeepSpeed, no recipe."""
