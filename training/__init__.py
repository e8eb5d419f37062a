"""routezoo.training"""
