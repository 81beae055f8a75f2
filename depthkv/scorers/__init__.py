"""depthkv.scorers"""
