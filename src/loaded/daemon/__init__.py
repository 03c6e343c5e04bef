"""The running balancer: a supervisor process and one worker per queue."""
