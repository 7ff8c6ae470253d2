"""TRL's trainers with GMT: the configs' ``gmt_*`` fields, the trainers, telemetry and run folders."""
