"""depthkv.tasks"""
