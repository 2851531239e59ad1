"""The paper's figures: curve data and their plots."""
