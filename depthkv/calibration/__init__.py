"""depthkv.calibration"""
