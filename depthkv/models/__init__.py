"""depthkv.models"""
