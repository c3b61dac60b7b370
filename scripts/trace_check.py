#!/usr/bin/env python3
"""Print the newest VisitMe trace from Jaeger: web span -> job span -> deleted ids.

Queries Jaeger v2's query API (/api/v3/traces, OTLP JSON) for recent traces of
the worker service, picks the newest one whose `process trim_visits` span
deleted visits, and prints the chain from the HTTP request to the job, with
the deleted visit ids (span events carrying `visit.id`). Exits 1 if there is
none yet (reload the page a few times, wait ~5 s for the batch export).
Standard library only.
"""
import argparse
import json
import sys
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone


def fetch_traces(jaeger, service, lookback_minutes):
    end = datetime.now(timezone.utc)
    start = end - timedelta(minutes=lookback_minutes)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    params = {
        # Both spellings: Jaeger renamed these to camelCase and accepts either.
        "query.service_name": service,
        "query.start_time_min": start.strftime(fmt),
        "query.start_time_max": end.strftime(fmt),
        "query.num_traces": "50",
        "query.serviceName": service,
        "query.startTimeMin": start.strftime(fmt),
        "query.startTimeMax": end.strftime(fmt),
    }
    url = f"{jaeger.rstrip('/')}/api/v3/traces?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    # The answer may be a stream of JSON objects, one per chunk.
    decoder, position, chunks = json.JSONDecoder(), 0, []
    while position < len(text):
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            break
        chunk, position = decoder.raw_decode(text, position)
        chunks.append(chunk)
    return chunks


def attribute_map(attributes):
    values = {}
    for attribute in attributes or []:
        value = attribute.get("value", {})
        values[attribute["key"]] = next(iter(value.values()), None) if value else None
    return values


def spans_of(chunks):
    spans = []
    for chunk in chunks:
        for resource_spans in chunk.get("result", chunk).get("resourceSpans", []):
            service = attribute_map(resource_spans.get("resource", {}).get("attributes")).get("service.name", "?")
            for scope in resource_spans.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    span["service"] = service
                    spans.append(span)
    return spans


def describe(span):
    return f"{span['service']}: {span['name']}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jaeger", default="http://127.0.0.1:16686", help="Jaeger query base URL")
    parser.add_argument("--service", default="visitme-worker", help="the worker's service.name")
    parser.add_argument("--lookback", type=int, default=60, help="minutes to search back")
    args = parser.parse_args()

    try:
        spans = spans_of(fetch_traces(args.jaeger, args.service, args.lookback))
    except OSError as error:
        print(f"trace-check: cannot query {args.jaeger}: {error}", file=sys.stderr)
        return 1
    by_id = {(s["traceId"], s["spanId"]): s for s in spans}
    jobs = []
    for span in spans:
        if span["name"] != "process trim_visits":
            continue
        ids = [attribute_map(e.get("attributes")).get("visit.id") for e in span.get("events", [])]
        ids = [str(i) for i in ids if i is not None]
        if ids:
            jobs.append((int(span.get("startTimeUnixNano", 0)), span, ids))
    if not jobs:
        print("trace-check: no trim job that deleted visits in the last "
              f"{args.lookback} minutes; reload the page a few times and retry", file=sys.stderr)
        return 1
    _, job, ids = max(jobs, key=lambda j: j[0])
    chain, current = [job], job
    while current.get("parentSpanId") and (current["traceId"], current["parentSpanId"]) in by_id:
        current = by_id[(current["traceId"], current["parentSpanId"])]
        chain.append(current)
    job_attributes = attribute_map(job.get("attributes"))
    print(f"trace {job['traceId']}")
    print("  " + " -> ".join(describe(s) for s in reversed(chain)))
    print(f"  job {job_attributes.get('job.id')} attempt {job_attributes.get('job.attempt')}")
    print(f"  deleted visit ids: {', '.join(ids)}")
    if chain[-1].get("kind") not in (2, "SPAN_KIND_SERVER"):
        print("trace-check: the job's trace does not reach the web request", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
