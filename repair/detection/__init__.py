"""Detection: options, the per-matrix solver (certified, structured, exact), the detector and its reports."""
