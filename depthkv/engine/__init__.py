"""depthkv.engine"""
