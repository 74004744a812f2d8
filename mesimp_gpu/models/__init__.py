"""Networks built from meProp layers."""
