"""Hardware: Dynamixel arm buses, RealSense cameras, teleop; drivers/sim stands in below them."""
