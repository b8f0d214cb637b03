// Command ferretdb runs an embedded FerretDB (MongoDB wire protocol) server
// for local development and tests. It is built and started by
// scripts/services.sh; it is not part of the ragchat application.
//
// We embed the library package instead of `go install`-ing FerretDB's own
// cmd/ferretdb, because that binary panics at start when built outside of
// FerretDB's repository ("Invalid build/version/version.txt file content",
// FerretDB issue 2982).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	handler := flag.String("handler", "sqlite", "backend: sqlite or postgresql")
	sqliteDir := flag.String("sqlite-dir", "", "directory for the sqlite backend's files (created if missing)")
	pgURL := flag.String("postgresql-url", "", "PostgreSQL URL for the postgresql backend")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "bad -log-level: %v\n", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg := &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Logger:   logger,
		Handler:  *handler,
	}

	switch *handler {
	case "sqlite":
		if *sqliteDir == "" {
			fmt.Fprintln(os.Stderr, "-sqlite-dir is required for the sqlite handler")
			os.Exit(2)
		}
		dir, err := filepath.Abs(*sqliteDir)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bad -sqlite-dir: %v\n", err)
			os.Exit(2)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "cannot create %s: %v\n", dir, err)
			os.Exit(1)
		}
		// FerretDB wants a "file:" URI naming an existing directory, ending with "/".
		cfg.SQLiteURL = "file:" + strings.TrimSuffix(dir, "/") + "/"
	case "postgresql":
		if *pgURL == "" {
			fmt.Fprintln(os.Stderr, "-postgresql-url is required for the postgresql handler")
			os.Exit(2)
		}
		cfg.PostgreSQLURL = *pgURL
	default:
		fmt.Fprintf(os.Stderr, "unknown -handler %q (want sqlite or postgresql)\n", *handler)
		os.Exit(2)
	}

	f, err := ferretdb.New(cfg)
	if err != nil {
		logger.Error("cannot start FerretDB", slog.Any("error", err))
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger.Info("FerretDB starting", slog.String("listen", *listen), slog.String("handler", *handler))
	if err := f.Run(ctx); err != nil {
		logger.Error("FerretDB stopped with an error", slog.Any("error", err))
		os.Exit(1)
	}
	logger.Info("FerretDB stopped")
}
