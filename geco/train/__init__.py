"""Training: the one loop every model runs (`loop`) and the process runtime it runs in
(`runtime`: device, DDP rank, seeds, logging, checkpoint files)."""
