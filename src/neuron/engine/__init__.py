"""Generation: one worker thread per device, stepping every active job in turn."""
