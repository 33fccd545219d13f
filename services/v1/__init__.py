"""Generated from protos/tuneloop/v1 by `make proto`; do not edit."""
