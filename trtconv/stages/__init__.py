"""The pipeline's steps: load, calibrate, export, engine, evaluate. No stage imports another."""
