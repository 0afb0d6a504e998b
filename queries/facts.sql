-- The sweep's tables as views. Every query file starts with `.read queries/facts.sql`; set the
-- sweep folder first (a local path or an s3:// URL DuckDB can read), and optionally which
-- traced facts to average ('correct', the default and Figure 2's rule, or 'all', as ROME's
-- Figure 3 notebook, for a sweep run with --correctness none):
--   duckdb -cmd "SET VARIABLE results = 'sweeps/sweep-0123456789ab'" -c ".read queries/rollup.sql"
--   duckdb -cmd "SET VARIABLE results = '...'" -cmd "SET VARIABLE facts = 'all'" -c ".read queries/figure3.sql"
CREATE OR REPLACE VIEW facts AS
  SELECT * FROM read_parquet(getvariable('results') || '/facts/*.parquet');
CREATE OR REPLACE VIEW traces AS
  SELECT * FROM read_parquet(getvariable('results') || '/traces/**/*.parquet', hive_partitioning = true);
-- Facts averaged per kind: traced, kept by the facts rule, with every row of the kind present.
-- A fact has a row per traced token (`traced_tokens`, the experiment's token selector) per
-- layer, per head for a kind whose rows carry one (`head`): a fact whose job was given up is
-- left out, as `coordinator aggregate` does.
CREATE OR REPLACE VIEW averaged AS
  SELECT t.kind, f.known_id, f.relation_id, f.high_score, f.low_score,
         f.subject_start AS b, f.subject_end AS e, len(f.tokens) AS n_tokens
  FROM facts f JOIN traces t USING (known_id)
  WHERE f.traced AND (coalesce(getvariable('facts'), 'correct') = 'all' OR coalesce(f.correct, true))
  GROUP BY ALL
  HAVING count(*) = len(any_value(f.traced_tokens)) * any_value(f.n_layers)
                    * CASE WHEN bool_or(t.head IS NOT NULL) THEN any_value(f.n_heads) ELSE 1 END;
-- The token roles the experiment traced (`--tokens`), from the manifest.
CREATE OR REPLACE VIEW asked AS
  SELECT settings.experiment.tokens AS roles
  FROM read_json(getvariable('results') || '/manifest.json');
-- ROME's token categories (notebook average_causal_effects), overlapping as there: a
-- one-token subject is its first and last token; when e = T-1 the last token is also the
-- first subsequent one; a subject ending the prompt has no first subsequent token. Only the
-- categories the selector asked for: a one-token subject's last subject token, traced alone,
-- does not stand for the first subject tokens of all facts.
CREATE OR REPLACE VIEW categorized AS
  SELECT a.kind, a.known_id, a.relation_id, t.layer, t.head, t.token, t.score, c.category,
         c.row_order
  FROM averaged a
  JOIN traces t ON t.known_id = a.known_id AND t.kind = a.kind
  JOIN (VALUES ('first_subject', 0), ('middle_subject', 1), ('last_subject', 2),
               ('first_subsequent', 3), ('further', 4), ('last', 5)) c(category, row_order)
    ON (SELECT list_contains(roles, 'all') OR list_contains(roles, replace(c.category, '_', '-'))
        FROM asked)
   AND CASE c.category
         WHEN 'first_subject' THEN t.token = a.b
         WHEN 'middle_subject' THEN t.token > a.b AND t.token < a.e - 1
         WHEN 'last_subject' THEN t.token = a.e - 1
         WHEN 'first_subsequent' THEN t.token = a.e AND a.e < a.n_tokens
         WHEN 'further' THEN t.token > a.e AND t.token < a.n_tokens - 1
         ELSE t.token = a.n_tokens - 1
       END;
