"""What a job took and what it cost: `timing` (the stage clock and report), `cost` (GPU price table)."""
