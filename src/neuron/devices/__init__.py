"""What this machine can run models on."""
