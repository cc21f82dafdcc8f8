"""The line gateway: a PLC's OPC UA trigger in, Triton's verdict back to the PLC, nothing lost.

    python -m client gateway --config gateway.yaml          # run it
    python -m client gateway --config gateway.yaml --check  # check the PLC nodes and the service, then exit
    python -m client plc-sim --config gateway.yaml --data data/quick_test --rate 2   # a simulated PLC

See `gateway.py` for the protocol on the PLC side, `outbox.py` for what survives a restart,
and `client/gateway/example.yaml` for a configuration to start from.
"""
