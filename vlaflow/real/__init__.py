"""The real layer: ROS 2 policy node, transports, robot contracts, safety, recorder, policy server."""
