"""GPU time-sharing: a memory budget per device and a scheduler that sleeps and wakes backends."""
