"""depthkv.eval"""
