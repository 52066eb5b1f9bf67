"""FedRE's algorithms on Flower (flwr): a ServerApp and a ClientApp that run the same
client and server functions as the in-process simulation (repro.fedre.algorithms), with
Flower as the transport, and the processes of a deployment on one machine.

- app: the ServerApp (the round loop of repro.fedre.simulate.run_rounds over Flower
  messages) and the ClientApp (one client per SuperNode, picked by its partition-id);
- state: what a client keeps between rounds, on disk (each message starts a fresh
  ClientApp process);
- deploy: a SuperLink and one SuperNode per client as processes on 127.0.0.1, and `flwr
  run` against them. The stage repro.fedre.flower_run drives it.
"""
