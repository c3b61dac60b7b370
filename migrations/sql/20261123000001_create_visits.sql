-- Visits recorded by the web tier (GET /). The trim job deletes by age, and the
-- page reads the newest rows, so both directions use the created_at index.
create table visits (
    id bigint generated always as identity primary key,
    visitor text not null,
    created_at timestamptz not null default now()
);

create index visits_created_at_idx on visits (created_at);
