#!/bin/bash
# Maps the InfluxQL database "<bucket>" (retention policy "autogen", the default) to compose's bucket,
# so Grafana's InfluxQL datasource (grafana/provisioning/datasources/influxdb.yaml) finds the data.
# The influxdb:2 image runs this once, right after DOCKER_INFLUXDB_INIT_MODE=setup created the org,
# bucket and admin token; its influx CLI is already configured with that token, and it exports the
# bucket's id. Volumes set up before this script existed still work: InfluxDB 2.7 gives every bucket
# without an explicit mapping a "virtual" one with the same database name and retention policy.
set -euo pipefail
influx v1 dbrp create \
  --org "${DOCKER_INFLUXDB_INIT_ORG}" \
  --bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
  --db "${DOCKER_INFLUXDB_INIT_BUCKET}" \
  --rp autogen \
  --default
