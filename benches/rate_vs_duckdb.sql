-- The work `tally rate` does, in DuckDB SQL, for the rate-vs-DuckDB benchmark.
--
-- {events} and {out} are filled in by benches/rate_vs_duckdb.py. Steps, as in tally:
-- 1. read the CloudEvents JSON lines with an explicit column spec;
-- 2. dedupe on (source, id), keeping the first occurrence in file order
--    (WITH ORDINALITY numbers the rows in file order; the driver checks this);
-- 3. keep events in the period [2026-10-01, 2026-11-01) UTC of the two metered types;
-- 4. hourly windows per (subject, type, model): count(*) for ai.resolution,
--    sum(tokens) for llm.tokens;
-- 5. monthly totals per (subject, meter, model), written as CSV.
SET threads = 2;
SET TimeZone = 'UTC';
COPY (
  WITH raw AS (
    SELECT ordinality AS rn, source, id, type, subject, time, data
    FROM read_json('{events}',
      format = 'newline_delimited',
      columns = {
        specversion: 'VARCHAR', id: 'VARCHAR', source: 'VARCHAR', type: 'VARCHAR',
        subject: 'VARCHAR', time: 'TIMESTAMPTZ', data: 'JSON'
      }) WITH ORDINALITY
  ),
  firsts AS (
    SELECT arg_min(type, rn) AS type, arg_min(subject, rn) AS subject,
           arg_min(time, rn) AS time, arg_min(data, rn) AS data
    FROM raw
    GROUP BY source, id
  ),
  metered AS (
    SELECT subject, type, time,
      CASE WHEN type = 'llm.tokens' THEN data ->> '$.model' END AS model,
      CASE WHEN type = 'llm.tokens' THEN CAST(data ->> '$.tokens' AS BIGINT) END AS tokens
    FROM firsts
    WHERE time >= TIMESTAMPTZ '2026-10-01 00:00:00+00'
      AND time < TIMESTAMPTZ '2026-11-01 00:00:00+00'
      AND type IN ('ai.resolution', 'llm.tokens')
  ),
  hourly AS (
    SELECT subject, type, model, date_trunc('hour', time) AS window_start,
      count(*) AS events,
      CASE WHEN type = 'ai.resolution' THEN count(*) ELSE sum(tokens) END AS value
    FROM metered
    GROUP BY subject, type, model, window_start
  )
  SELECT subject AS customer,
    CASE type WHEN 'ai.resolution' THEN 'resolutions' ELSE 'tokens' END AS meter,
    model, sum(value) AS quantity, sum(events) AS events, count(*) AS windows
  FROM hourly
  GROUP BY subject, type, model
  ORDER BY customer, meter, model
) TO '{out}' (HEADER);
